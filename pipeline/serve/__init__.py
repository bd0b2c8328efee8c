"""Ray Serve: the OpenAI-compatible endpoint (`app`), its batching engine (`engine`), the API schema.

`pipeline.serve:app_builder` is the import path users' Serve configs name; it is re-exported here
lazily, so importing `pipeline.serve.engine` or `pipeline.serve.openai_api` alone does not load Ray Serve.
"""


def __getattr__(name: str):
    if name in ("app_builder", "build_app"):
        from pipeline.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'pipeline.serve' has no attribute {name!r}")
