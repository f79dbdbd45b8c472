"""Provenance: what names the code, the packages and the machine behind a result."""

def test_source_digest_names_the_code_and_lands_in_every_environment(tmp_path):
    from sparseswaps.provenance import environment, source_digest

    (tmp_path / "solvers").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "solvers" / "b.py").write_text("y = 2\n")
    (tmp_path / "notes.txt").write_text("not code")
    first = source_digest(tmp_path)
    (tmp_path / "notes.txt").write_text("still not code")
    assert source_digest(tmp_path) == first
    (tmp_path / "solvers" / "b.py").write_text("y = 3\n")
    assert source_digest(tmp_path) != first
    (tmp_path / "solvers" / "b.py").write_text("y = 2\n")
    (tmp_path / "solvers" / "b.py").rename(tmp_path / "solvers" / "c.py")
    assert source_digest(tmp_path) != first
    assert environment()["source_sha256"] == source_digest()
