// Command gointerop checks our log artefacts with Go's golang.org/x/mod
// sumdb/note and sumdb/tlog, and makes artefacts for our code to check.
//
//	gointerop verify DIR   DIR holds log.vkey, checkpoint, C2SP tiles, proofs.json
//	gointerop make DIR     writes go.json: a Go-signed note, tree and proofs
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

type inclusion struct {
	Index int64    `json:"index"`
	Entry []byte   `json:"entry"`
	Proof [][]byte `json:"proof"`
}

type consistency struct {
	Old     int64    `json:"old"`
	OldRoot []byte   `json:"old_root"`
	Proof   [][]byte `json:"proof"`
}

type proofs struct {
	Inclusion   []inclusion   `json:"inclusion"`
	Consistency []consistency `json:"consistency"`
}

// c2spTiles reads tiles from a C2SP layout: Go's tile/8/L/N is our tile/L/N.
type c2spTiles struct{ dir string }

func (c c2spTiles) Height() int { return 8 }

func (c c2spTiles) ReadTiles(tiles []tlog.Tile) ([][]byte, error) {
	out := make([][]byte, len(tiles))
	for i, t := range tiles {
		p := strings.Replace(t.Path(), "tile/8/", "tile/", 1)
		b, err := os.ReadFile(filepath.Join(c.dir, p))
		if err != nil {
			return nil, err
		}
		out[i] = b
	}
	return out, nil
}

func (c c2spTiles) SaveTiles([]tlog.Tile, [][]byte) {}

// toHash copies a 32-byte slice into a tlog.Hash (Go 1.19 has no slice-to-array conversion).
func toHash(b []byte) tlog.Hash {
	var h tlog.Hash
	if len(b) != len(h) {
		fail("hash of %d bytes", len(b))
	}
	copy(h[:], b)
	return h
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

func verify(dir string) {
	vkey, err := os.ReadFile(filepath.Join(dir, "log.vkey"))
	if err != nil {
		fail("%v", err)
	}
	v, err := note.NewVerifier(strings.TrimSpace(string(vkey)))
	if err != nil {
		fail("vkey: %v", err)
	}
	msg, err := os.ReadFile(filepath.Join(dir, "checkpoint"))
	if err != nil {
		fail("%v", err)
	}
	n, err := note.Open(msg, note.VerifierList(v))
	if err != nil {
		fail("note.Open: %v", err)
	}
	// Go's ParseTree only knows the sumdb origin line; C2SP checkpoints carry
	// the log's own origin, so hand Go the size and hash lines under its own.
	_, rest, _ := strings.Cut(n.Text, "\n")
	tree, err := tlog.ParseTree([]byte("go.sum database tree\n" + rest))
	if err != nil {
		fail("ParseTree: %v", err)
	}
	// TileHashReader checks every tile it reads against the signed tree hash.
	hr := tlog.TileHashReader(tree, c2spTiles{dir})
	th, err := tlog.TreeHash(tree.N, hr)
	if err != nil || th != tree.Hash {
		fail("TreeHash from tiles: %v (%v != %v)", err, th, tree.Hash)
	}
	var ps proofs
	b, err := os.ReadFile(filepath.Join(dir, "proofs.json"))
	if err != nil {
		fail("%v", err)
	}
	if err := json.Unmarshal(b, &ps); err != nil {
		fail("proofs.json: %v", err)
	}
	for _, p := range ps.Inclusion {
		var rp tlog.RecordProof
		for _, h := range p.Proof {
			rp = append(rp, toHash(h))
		}
		if err := tlog.CheckRecord(rp, tree.N, tree.Hash, p.Index, tlog.RecordHash(p.Entry)); err != nil {
			fail("CheckRecord %d: %v", p.Index, err)
		}
		goProof, err := tlog.ProveRecord(tree.N, p.Index, hr)
		if err != nil || len(goProof) != len(rp) {
			fail("ProveRecord %d: %v", p.Index, err)
		}
		for i := range rp {
			if goProof[i] != rp[i] {
				fail("ProveRecord %d differs at %d", p.Index, i)
			}
		}
	}
	for _, p := range ps.Consistency {
		var tp tlog.TreeProof
		for _, h := range p.Proof {
			tp = append(tp, toHash(h))
		}
		if err := tlog.CheckTree(tp, tree.N, tree.Hash, p.Old, toHash(p.OldRoot)); err != nil {
			fail("CheckTree %d: %v", p.Old, err)
		}
		goProof, err := tlog.ProveTree(tree.N, p.Old, hr)
		if err != nil || len(goProof) != len(tp) {
			fail("ProveTree %d: %v", p.Old, err)
		}
		for i := range tp {
			if goProof[i] != tp[i] {
				fail("ProveTree %d differs at %d", p.Old, i)
			}
		}
	}
	fmt.Printf("OK size=%d inclusion=%d consistency=%d\n", tree.N, len(ps.Inclusion), len(ps.Consistency))
}

type made struct {
	Vkey        string            `json:"vkey"`
	Note        []byte            `json:"note"`
	Entries     [][]byte          `json:"entries"`
	Size        int64             `json:"size"`
	Root        []byte            `json:"root"`
	Inclusion   []inclusion       `json:"inclusion"`
	Consistency []consistency     `json:"consistency"`
	Tiles       map[string][]byte `json:"tiles"`
}

// memHashes is a tlog.HashReader over stored hashes in memory.
type memHashes []tlog.Hash

func (m memHashes) ReadHashes(idx []int64) ([]tlog.Hash, error) {
	out := make([]tlog.Hash, len(idx))
	for i, x := range idx {
		out[i] = m[x]
	}
	return out, nil
}

func makeArtefacts(dir string) {
	skey, vkey, err := note.GenerateKey(zeroReader{}, "go.example/log")
	if err != nil {
		fail("GenerateKey: %v", err)
	}
	signer, err := note.NewSigner(skey)
	if err != nil {
		fail("NewSigner: %v", err)
	}
	var stored memHashes
	var entries [][]byte
	const size = 300
	for i := int64(0); i < size; i++ {
		e := []byte(fmt.Sprintf("go entry %d", i))
		entries = append(entries, e)
		hs, err := tlog.StoredHashes(i, e, stored)
		if err != nil {
			fail("StoredHashes: %v", err)
		}
		stored = append(stored, hs...)
	}
	root, err := tlog.TreeHash(size, stored)
	if err != nil {
		fail("TreeHash: %v", err)
	}
	text := tlog.FormatTree(tlog.Tree{N: size, Hash: root})
	msg, err := note.Sign(&note.Note{Text: string(text)}, signer)
	if err != nil {
		fail("Sign: %v", err)
	}
	out := made{Vkey: vkey, Note: msg, Entries: entries, Size: size, Root: root[:], Tiles: map[string][]byte{}}
	for _, idx := range []int64{0, 1, 7, 128, 255, 256, 299} {
		p, err := tlog.ProveRecord(size, idx, stored)
		if err != nil {
			fail("ProveRecord: %v", err)
		}
		inc := inclusion{Index: idx, Entry: entries[idx]}
		for i := range p {
			inc.Proof = append(inc.Proof, p[i][:])
		}
		out.Inclusion = append(out.Inclusion, inc)
	}
	for _, old := range []int64{1, 2, 3, 100, 256, 257, 299, 300} {
		p, err := tlog.ProveTree(size, old, stored)
		if err != nil {
			fail("ProveTree: %v", err)
		}
		oldRoot, _ := tlog.TreeHash(old, stored)
		c := consistency{Old: old, OldRoot: oldRoot[:]}
		for i := range p {
			c.Proof = append(c.Proof, p[i][:])
		}
		out.Consistency = append(out.Consistency, c)
	}
	for _, t := range tlog.NewTiles(8, 0, size) {
		data, err := tlog.ReadTileData(t, stored)
		if err != nil {
			fail("ReadTileData: %v", err)
		}
		out.Tiles[strings.Replace(t.Path(), "tile/8/", "tile/", 1)] = data
	}
	b, _ := json.Marshal(out)
	if err := os.WriteFile(filepath.Join(dir, "go.json"), b, 0o644); err != nil {
		fail("%v", err)
	}
	fmt.Println("OK made")
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = 0
	}
	return len(p), nil
}

func main() {
	if len(os.Args) != 3 {
		fail("usage: gointerop verify|make DIR")
	}
	switch os.Args[1] {
	case "verify":
		verify(os.Args[2])
	case "make":
		makeArtefacts(os.Args[2])
	default:
		fail("unknown mode %q", os.Args[1])
	}
}
