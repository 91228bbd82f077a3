"""The REST API: OpenAI-compatible routes plus the original /predict."""
