"""Open Inference Protocol (KServe v2) schemas and tensor codec, binary extension included."""
