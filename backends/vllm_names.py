"""The vLLM metric names Maestro relies on, in one place (checked against vLLM's source and a real server).

The simulated engine exports exactly these names and label sets; the adapter scrapes them. Counters are
declared without the ``_total`` suffix, as ``prometheus_client`` does; the exposition adds it.
"""

GAUGE_REQUESTS_RUNNING = "vllm:num_requests_running"
GAUGE_REQUESTS_WAITING = "vllm:num_requests_waiting"
GAUGE_KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"  # a fraction 0..1 despite the name
GAUGE_SLEEP_STATE = "vllm:engine_sleep_state"  # label sleep_state = awake | weights_offloaded | discard_all
# Info-style gauge (value 1) whose labels are the engine's CacheConfig; the gateway reads num_gpu_blocks and
# block_size from it (KV capacity in tokens = their product). num_gpu_blocks is "None" until profiling ends.
INFO_CACHE_CONFIG = "vllm:cache_config_info"
LABEL_NUM_GPU_BLOCKS = "num_gpu_blocks"
LABEL_BLOCK_SIZE = "block_size"
COUNTER_PREEMPTIONS = "vllm:num_preemptions"
COUNTER_PROMPT_TOKENS = "vllm:prompt_tokens"
COUNTER_GENERATION_TOKENS = "vllm:generation_tokens"
COUNTER_REQUEST_SUCCESS = "vllm:request_success"  # label finished_reason = stop | length | abort | error | repetition
# Requests the frontend refused with a 503 (back-pressure); labels model_name and reason (no engine label)
COUNTER_ADMISSION_REJECTIONS = "vllm:admission_rejections"
ADMISSION_REASONS = ("max_num_queued_reqs", "max_num_queued_tokens")
HIST_TTFT = "vllm:time_to_first_token_seconds"
HIST_INTER_TOKEN = "vllm:inter_token_latency_seconds"
HIST_E2E = "vllm:e2e_request_latency_seconds"
HIST_QUEUE_TIME = "vllm:request_queue_time_seconds"
HIST_PREFILL_TIME = "vllm:request_prefill_time_seconds"
HIST_DECODE_TIME = "vllm:request_decode_time_seconds"
HIST_PROMPT_TOKENS = "vllm:request_prompt_tokens"
HIST_GENERATION_TOKENS = "vllm:request_generation_tokens"

# Labels every vLLM series carries.
LABEL_ENGINE = "engine"
LABEL_MODEL = "model_name"

SCRAPED_SAMPLE_NAMES = (
    GAUGE_REQUESTS_RUNNING,
    GAUGE_REQUESTS_WAITING,
    GAUGE_KV_CACHE_USAGE,
    GAUGE_SLEEP_STATE,
    COUNTER_PREEMPTIONS + "_total",
    COUNTER_PROMPT_TOKENS + "_total",
    COUNTER_GENERATION_TOKENS + "_total",
)
