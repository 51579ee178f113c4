"""The gateway's own TEE identity: keys derived from dstack KMS, its attestation
document (built over the attested keyset) and the dstack guest-agent simulator
used off-TEE. It imports only `verifier.tee` (the formats clients check) and
`dstack-sdk`/`cryptography`; never the API, upstream or receipts code.
"""
