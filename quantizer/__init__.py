"""The kquant quantizer: fetch, convert, calibrate, quantize, evaluate and publish GGUF variants."""
