"""The package's public surface is explicit: everything listed exists and is exported
from the module that defines it, so `from edge_agent import X` keeps working."""

import edge_agent


def test_all_names_exist_and_nothing_private_leaks() -> None:
    for name in edge_agent.__all__:
        assert hasattr(edge_agent, name), name
        assert not name.startswith("_") or name == "__version__"
    public = {n for n in dir(edge_agent) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(edge_agent, n)).__name__ == "module"}
    assert public - modules <= set(edge_agent.__all__)
