# One image for the whole stack: the Dask scheduler, the Dask workers and the REST API.
# Workers must import the same b3mine/pipelines code as the API that submits the tasks.
# No torch here: the pipeline and the service need only the [pipeline,service] extras (FAISS CPU).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# libgomp1: OpenMP runtime of faiss-cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Copy only what the package needs (keeps .venv, caches and data out of the image).
COPY pyproject.toml README.md ./
COPY b3mine ./b3mine
COPY pipelines ./pipelines
COPY service ./service
COPY trainers ./trainers
RUN pip install ".[pipeline,service]"

RUN useradd --create-home --uid 1000 b3mine \
    && mkdir -p /data && chown b3mine:b3mine /data
USER b3mine

ENV B3MINE_DATA_ROOT=/data
VOLUME ["/data"]
EXPOSE 8000 8786 8787

CMD ["b3mine", "serve", "--host", "0.0.0.0", "--port", "8000"]
