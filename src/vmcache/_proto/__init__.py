"""Code generated from protos/cache.proto by scripts/gen_proto.py."""
