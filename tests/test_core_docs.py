"""The README's config reference is the one generated from the models."""
from genbackends.config_docs import END, START, readme_block


def test_readme_config_reference_is_current(repo_root):
    text = (repo_root / "README.md").read_text()
    assert START in text and END in text
    current = text[text.index(START) : text.index(END) + len(END)]
    assert current == readme_block(), "regenerate: python -m genbackends.config_docs (README section between markers)"


def test_readme_plugin_example_works(repo_root):
    """The ~30-line plugin in the README is real code: registered in-process, it generates."""
    import types

    from genbackends.config_loader import load_config
    from genbackends.registry import Registry

    text = (repo_root / "README.md").read_text()
    start = text.index("# genbackends_echo/plugin.py")
    code = text[start : text.index("```", start)]
    mod = types.ModuleType("readme_echo_plugin")
    exec(compile(code, "README.md", "exec"), mod.__dict__)
    reg = Registry(allow=["hf"])
    reg.register_object(mod, name="readme-echo")
    cfg = load_config(base={"backend": "echo", "model": "none", "seq_length": 32, "sampling": {"max_new_tokens": 3}})
    with reg.create_backend(cfg) as b:
        assert [r.text for r in b.generate(["abcd", "xy"])] == ["dcb", "yx"]
