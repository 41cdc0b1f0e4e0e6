# A silo agent: trains next to the hospital's data, on the GPU when the container is granted one (device: auto),
# on the CPU otherwise. Build from the repository root:
#   docker build -f deploy/docker/silo.Dockerfile -t fedmeki-silo:0.1.0 .
# Its kit, silo.yaml and data are mounted at run time (read-only): nothing secret is in the image. It also
# carries `fedmeki` (provisioning, jobs), which needs the data formats and torch the coordinator image leaves out.

# Base images are pinned by digest (the tag only says which one it was): docs/operator-guide.md, "Supply chain".
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime@sha256:2b59b1b91885677814f78be1f8df48a25d5dc952eb6580eaecfefca510f9afd3 AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The venv sees the base's CUDA build of torch (and what torch needs), which the lock leaves out.
RUN python -m venv --system-site-packages /opt/fedmeki
# The lock (scripts/lock) pins every other dependency with its sha256: pip refuses any file that does not match.
COPY deploy/docker/silo-requirements.txt /tmp/silo-requirements.txt
RUN /opt/fedmeki/bin/pip install --no-cache-dir --require-hashes --no-deps --requirement /tmp/silo-requirements.txt
COPY pyproject.toml README.md /src/
COPY fedmeki_core /src/fedmeki_core
COPY coordinator /src/coordinator
COPY silo_agent /src/silo_agent
# Its dependencies are all in place: --no-deps, and built with the locked setuptools (--no-build-isolation).
RUN /opt/fedmeki/bin/pip install --no-cache-dir --no-deps --no-build-isolation /src

FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime@sha256:2b59b1b91885677814f78be1f8df48a25d5dc952eb6580eaecfefca510f9afd3
RUN groupadd --system --gid 10001 fedmeki \
    && useradd --system --uid 10001 --gid fedmeki --home-dir /var/lib/fedmeki-silo --shell /usr/sbin/nologin fedmeki \
    && install -d -o fedmeki -g fedmeki -m 0750 /var/lib/fedmeki-silo /data /etc/fedmeki /etc/fedmeki/kits
COPY --from=build /opt/fedmeki /opt/fedmeki
ENV PATH=/opt/fedmeki/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FEDMEKI_LOG_FORMAT=json \
    FEDMEKI_SILO_WORK_DIR=/var/lib/fedmeki-silo \
    FEDMEKI_SILO_DEVICE=auto
USER 10001:10001
WORKDIR /var/lib/fedmeki-silo
ENTRYPOINT ["fedmeki-silo"]
CMD ["run"]
