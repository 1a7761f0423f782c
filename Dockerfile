# The image every step of a study runs in on a cluster (MLflow Projects' Kubernetes
# backend, deploy/kubernetes): Python 3.11 as in conda.yaml, the pinned dependencies of
# pyproject.toml, prunelab itself with its presets, and Debian's FashionMNIST so the
# default study needs neither a volume nor a download.
#
#   docker build -t registry.example.org/prunelab:0.1.0 .
#   docker push registry.example.org/prunelab:0.1.0
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/prunelab
# Dependencies first (their layer is reused while only prunelab's code changes).
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > requirements.txt \
 && pip install --no-cache-dir -r requirements.txt
COPY MLproject mlproject.sh conda.yaml ./
COPY deploy ./deploy
COPY src ./src
RUN pip install --no-cache-dir --no-deps . && prunelab settings >/dev/null

# A step's run id and tracking server come from the Job's environment (MLflow sets them).
ENV MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
WORKDIR /work
