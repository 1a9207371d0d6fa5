# Maestro gateway image (also runs the simulated engines). Real vLLM engines use vLLM's own image.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY predictor ./predictor
COPY backends ./backends
COPY loadgen ./loadgen
COPY examples ./examples
RUN pip install --no-cache-dir . \
 && useradd --system --uid 10001 --home-dir /app maestro && chown maestro /app
# not root; /app stays writable for what the gateway writes in its working folder (online learning's maestro-online/)
USER maestro
EXPOSE 8000
ENTRYPOINT ["maestro"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
