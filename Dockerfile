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
RUN pip install --no-cache-dir .
EXPOSE 8000
ENTRYPOINT ["maestro"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
