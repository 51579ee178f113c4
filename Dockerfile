# syntax=docker/dockerfile:1
# One image for every service of the stack (gateway, tlog, witness, monitor); compose.yaml
# picks the command. docs/deploy.md explains the build and what the compose hash binds.
#
# Both stages use the same base image, pinned by digest: a tag can be re-pushed, a digest
# cannot, and the image digest is what a release names. To move to a newer base, resolve
# the tag's digest (`docker buildx imagetools inspect python:3.11-slim-bookworm`) and
# replace it in both FROM lines.

# --- build: install the project from this checkout into a self-contained venv ----------
FROM python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1 AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY gateway ./gateway
COPY tlog ./tlog
COPY witness ./witness
COPY verifier ./verifier
RUN python -m venv /opt/pag \
 && /opt/pag/bin/pip install --upgrade pip \
 && /opt/pag/bin/pip install -c /src/requirements.lock '/src[server]' \
 && /opt/pag/bin/pag-gateway --version

# --- runtime: the venv only, run by an unprivileged user --------------------------------
FROM python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1 AS runtime
ENV PATH=/opt/pag/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 pag \
 && useradd --system --uid 10001 --gid pag --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin pag \
 && mkdir -p /data/gateway /data/tlog /data/witness /data/monitor /run/pag/keys \
 && chown -R pag:pag /data /run/pag
# A new named volume mounted on one of these directories starts with its ownership.
COPY --from=build /opt/pag /opt/pag
USER 10001:10001
WORKDIR /data
EXPOSE 8443 8081 8082 8090
CMD ["pag-gateway", "--help"]
