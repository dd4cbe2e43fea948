"""What tests share: test servers (OpenAI-protocol, Prefect, S3), stand-ins for upstream stages, helpers."""
