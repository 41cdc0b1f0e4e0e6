# The coordinator: gRPC API, scheduler, aggregation, store. No torch and no CUDA: it handles tensors as numpy arrays.
# Build from the repository root:  docker build -f deploy/docker/coordinator.Dockerfile -t fedmeki-coordinator:0.1.0 .
# Configuration comes at run time (FEDMEKI_COORDINATOR_* variables, a mounted coordinator.yaml, the kit mounted
# read-only): nothing secret is in the image.

# Base images are pinned by digest (the tag only says which one it was): docs/operator-guide.md, "Supply chain".
FROM python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5 AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/fedmeki
# The lock (scripts/lock) pins every package with its sha256: pip refuses any file that does not match.
COPY deploy/docker/coordinator-requirements.txt /tmp/coordinator-requirements.txt
RUN /opt/fedmeki/bin/pip install --no-cache-dir --require-hashes --no-deps --requirement /tmp/coordinator-requirements.txt
COPY pyproject.toml README.md /src/
COPY fedmeki_core /src/fedmeki_core
COPY coordinator /src/coordinator
COPY silo_agent /src/silo_agent
# Without its declared dependencies: those are the silos' (torch, transformers, image and signal formats), so
# only fedmeki-coordinator runs here; `fedmeki` (provision, jobs) comes with the silo image.
# --no-build-isolation: built with the locked setuptools, not one fetched unpinned for the build.
RUN /opt/fedmeki/bin/pip install --no-cache-dir --no-deps --no-build-isolation /src

FROM python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5
RUN groupadd --system --gid 10001 fedmeki \
    && useradd --system --uid 10001 --gid fedmeki --home-dir /var/lib/fedmeki --shell /usr/sbin/nologin fedmeki \
    && install -d -o fedmeki -g fedmeki -m 0700 /var/lib/fedmeki \
    && install -d -o fedmeki -g fedmeki -m 0750 /etc/fedmeki
COPY --from=build /opt/fedmeki /opt/fedmeki
# Every address, as a container must; without a kit (FEDMEKI_COORDINATOR_KIT, or --kit) the coordinator then
# refuses to start rather than serve plaintext: mount the kit, or set FEDMEKI_COORDINATOR_INSECURE_PLAINTEXT=true
# on a network you trust.
ENV PATH=/opt/fedmeki/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FEDMEKI_LOG_FORMAT=json \
    FEDMEKI_COORDINATOR_ADDRESS=0.0.0.0:50051 \
    FEDMEKI_COORDINATOR_HEALTH_ADDRESS=0.0.0.0:50052 \
    FEDMEKI_COORDINATOR_DATA_DIR=/var/lib/fedmeki
USER 10001:10001
WORKDIR /var/lib/fedmeki
# 50051 the API (mTLS with a kit), 50052 the plaintext health-only port the probes use.
EXPOSE 50051 50052
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-m", "coordinator.healthcheck"]
ENTRYPOINT ["fedmeki-coordinator"]
CMD ["serve"]
