"""The configs of bct, found by name (`--config NAME`): each file's `get_config()`
and its docstring, which gives the command that runs it and the result to expect."""

__all__: list[str] = []
