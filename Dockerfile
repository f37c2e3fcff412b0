# syntax=docker/dockerfile:1
#
# One image for cilia's agent, operator and CNI plugin:
#
#   docker build -t cilia:dev .
#
# Stages: `bpf` compiles the datapath (bpf/build/*.o); `python` installs cilia into a
# virtual environment and builds the standalone CNI plugin (PyInstaller, one-folder: the
# nodes need no Python); the last stage is the runtime image, which holds only what runs.
#
# The base is pinned to a Debian point release tag (12.11: bookworm, glibc 2.36, clang 14,
# libbpf 1.1, Python 3.11), the same for every stage, so the virtual environment built in
# one stage runs in the other. Pin it harder with a digest when building:
#   docker build --build-arg BASE="debian:12.11-slim@sha256:$(...)" .
# (`docker buildx imagetools inspect debian:12.11-slim` prints it.) Packages are not pinned
# one by one: within a point release Debian ships only security and bug fixes.
#
# Who runs as what: the image's user is 65532 (non-root); the operator runs as it. The
# agent and its init containers run as root because they must (veths, network namespaces,
# BPF, mounts, sysctls): the chart says so per container.

ARG BASE=debian:12.11-slim

# ---- the BPF datapath -----------------------------------------------------------------
FROM ${BASE} AS bpf
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang llvm libbpf-dev make gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY bpf/ bpf/
RUN make -C bpf && ls -l bpf/build/

# ---- cilia in a virtual environment, and the standalone CNI plugin ----------------------
FROM ${BASE} AS python
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Every Python distribution at the version and hash uv.lock names (the tests ran with
# exactly these): packaging/image/requirements.py writes both files from the lock.
COPY packaging/image/requirements.txt packaging/image/requirements-build.txt packaging/image/
# The build environment: the runtime dependencies, setuptools (builds cilia's wheel with no
# isolated environment fetched from the index) and PyInstaller (the plugin).
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip install --no-cache-dir --require-hashes \
      -r packaging/image/requirements-build.txt
COPY pyproject.toml README.md ./
COPY cilia/ cilia/
COPY agent/ agent/
COPY cni/ cni/
COPY operator/ operator/
COPY packaging/cni/ packaging/cni/
RUN /opt/build/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation -w /wheels /src \
 && python3 -m venv /opt/cilia/venv \
 && /opt/cilia/venv/bin/pip install --no-cache-dir --require-hashes \
      -r packaging/image/requirements.txt \
 && /opt/cilia/venv/bin/pip install --no-cache-dir --no-deps /wheels/cilia-*.whl
# The plugin, from a plain install of cilia (packaging/cni/build.sh), checked to answer
# VERSION.
RUN PYTHON=/opt/build/bin/python packaging/cni/build.sh /opt/cni-build

# ---- the image ------------------------------------------------------------------------
FROM ${BASE}
LABEL org.opencontainers.image.title="cilia" \
      org.opencontainers.image.description="cilia: Kubernetes networking and NetworkPolicy on eBPF (agent, operator, CNI plugin)" \
      org.opencontainers.image.licenses="Apache-2.0"
# python3: the agent, operator and CLI. libbpf1: the datapath loader (cffi, ABI mode).
# iproute2, iptables: the agent (masquerade) and the uninstall clean-up; both iptables
# backends are there and the agent uses the node's (--iptables-mode auto). mount: bpffs.
# bpftool: for looking at the datapath from inside the agent's container.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libbpf1 iproute2 iptables mount bpftool \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 cilia \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin cilia
COPY --from=python /opt/cilia/venv /opt/cilia/venv
COPY --from=python /opt/cni-build/dist/cilia-cni/ /usr/lib/cilia/cni/
COPY --from=bpf /src/bpf/build/ /usr/lib/cilia/bpf/
ENV PATH=/opt/cilia/venv/bin:$PATH \
    CILIA_BPF_DIR=/usr/lib/cilia/bpf \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Fails the build if anything is missing: the three commands, the objects, the plugin.
RUN cilia --help >/dev/null \
 && cilia-agent --help >/dev/null \
 && test -x /opt/cilia/venv/bin/cilia-operator \
 && ls /usr/lib/cilia/bpf/bpf_lxc.o \
 && CNI_COMMAND=VERSION /usr/lib/cilia/cni/cilia-cni </dev/null
USER 65532:65532
CMD ["cilia", "--help"]
