# GPU worker image on the official vLLM image of the pinned version.
#   docker build -f deploy/docker/worker-gpu.Dockerfile -t chat-service/worker-gpu:0.1.0 .
# The model is not baked in: mount it (e.g. at /models/my-model) and set
# WORKER_MODEL=my-model=/models/my-model (and GATEWAY_MODELS likewise for the gateway).
FROM vllm/vllm-openai:v0.33.0
WORKDIR /app
# vLLM's image brings torch, transformers and xgrammar; add only what the worker needs besides.
RUN pip install --no-cache-dir grpcio==1.85.1 grpcio-tools==1.85.1 grpcio-status==1.85.1 \
        redis[hiredis]==8.1.0 prometheus-client==0.26.0 uvloop==0.23.0 psutil==7.2.2
COPY proto/ proto/
RUN mkdir -p gen && python3 -m grpc_tools.protoc -Iproto --python_out=gen --pyi_out=gen --grpc_python_out=gen \
        $(find proto -name '*.proto')
COPY common/ common/
COPY worker/ worker/
RUN useradd --uid 10001 --create-home chat
ENV PYTHONPATH=/app:/app/gen \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf \
    HF_HUB_OFFLINE=1 \
    VLLM_CACHE_ROOT=/tmp/vllm \
    VLLM_NO_USAGE_STATS=1 \
    WORKER_ENGINE=vllm
USER 10001:10001
EXPOSE 9101
ENTRYPOINT ["python3", "-m", "worker"]
