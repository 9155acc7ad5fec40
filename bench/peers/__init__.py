"""The peer benchmark (`python -m bench.peers`): this service against the servers a user would
otherwise reach for, each in its own venv. The server modules here import only numpy, Pillow,
onnxruntime and their framework, so this package must stay import-light."""
