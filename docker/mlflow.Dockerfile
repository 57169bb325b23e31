# syntax=docker/dockerfile:1
# The MLflow tracking server of docker/compose.yaml: mlflow 3.17.2 with the PostgreSQL driver.
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN pip install --no-cache-dir mlflow==3.17.2 psycopg2-binary==2.9.13 \
    && useradd --create-home --uid 1000 mlflow \
    && mkdir -p /mlartifacts && chown mlflow:mlflow /mlartifacts
USER 1000
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--help"]
