"""The router's core: admission, each request's walk prefill -> KV hand-off -> decode, the workers' book and the metrics."""
