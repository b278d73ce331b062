# syntax=docker/dockerfile:1
# optserve server image: a wheel built in one stage, installed into a clean slim runtime.

FROM python:3.11-slim AS build
# Optional extras of the optserve distribution, e.g. "postgres" for OPTSERVE_STORAGE=postgres
# (deploy/compose.yml builds with it); none by default.
ARG OPTSERVE_EXTRAS=""
WORKDIR /src
# A C compiler and Python's headers for the native kernels (service/core/_native.c). Not
# pinned: whichever the base image's Debian has compiles the same bits (-ffp-contract=off),
# and only the wheel reaches the runtime stage.
# hadolint ignore=DL3008
RUN apt-get update -q \
    && apt-get install -y -q --no-install-recommends gcc libc6-dev \
    && (python -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("include"), "Python.h")))' \
        || apt-get install -y -q --no-install-recommends python3-dev) \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md ./
COPY service ./service
RUN python -m pip install --no-cache-dir --upgrade pip==24.3.1 \
    && python -m pip wheel --no-cache-dir --wheel-dir /wheels ".${OPTSERVE_EXTRAS:+[$OPTSERVE_EXTRAS]}"

FROM python:3.11-slim AS runtime
# Replicas replay each other's sessions and must compute the same bits: pin numpy's SIMD
# level and OpenBLAS's kernels and threads (service/core/machine.py, docs/storage.md
# "Replays across machines"). Needs an x86-64-v3 CPU (AVX2, FMA).
ENV OPENBLAS_CORETYPE=Haswell \
    OPENBLAS_NUM_THREADS=1 \
    NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OPTSERVE_HOST=0.0.0.0 \
    OPTSERVE_PORT=8000 \
    OPTSERVE_DATA_DIR=/data
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin optserve \
    && mkdir -p /data \
    && chown optserve /data
USER 10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('OPTSERVE_PORT', '8000'), timeout=2)"]
# Binding 0.0.0.0 requires API keys (OPTSERVE_API_KEYS or OPTSERVE_API_KEYS_FILE);
# the server refuses to start open on a non-loopback address.
CMD ["optserve", "serve"]
