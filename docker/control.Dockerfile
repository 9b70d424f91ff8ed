# The control-machine image of blf, which is also the public node's Docker form:
#
#   docker build -f docker/control.Dockerfile -t blindference-node .
#   docker run -d --name blindference-node \
#     -e BLF_KEY_PASSWORD=... -e BLF_ICL_ENDPOINT=https://icl.blindference.xyz \
#     -v /host/config:/root/.blindference blindference-node
#
# The node directory is /root/.blindference (the default ~/.blindference of the root user),
# mounted from the host: config.json, the keystore, cluster.key and control.key live there,
# never in the image. The default command, `run`, starts the whole node with its embedded
# Redis on a unix socket in that directory. compose/control.yml runs the same image as
# separate beat, control worker and Flower services instead. See docs/deploy.md.
ARG PYTHON_IMAGE=python:3.11-slim

# --- the CoFHE SDK helper's Node.js dependencies (package.json's, without the dev tools) ---
FROM ${PYTHON_IMAGE} AS node-modules
RUN apt-get update \
 && apt-get install -y --no-install-recommends nodejs npm ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/blf
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund \
 && mkdir -p node_modules

# --- the node ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Node.js runs the CoFHE SDK helper (cofhe_mode "bridge"); npm is not needed at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends nodejs ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=node-modules /opt/blf/node_modules /opt/blf/node_modules
ENV BLF_COFHE_BRIDGE_MODULES=/opt/blf/node_modules

WORKDIR /opt/blf/src
COPY pyproject.toml README.md beat_schedule.py ./
COPY blf ./blf
COPY workers ./workers
RUN pip install . \
 && rm -rf build ./*.egg-info

# The node directory: mount the host's over it (-v /host/config:/root/.blindference).
RUN mkdir -m 700 /root/.blindference
WORKDIR /root

ENTRYPOINT ["blindference-node"]
CMD ["run"]
