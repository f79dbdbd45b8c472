import pytest

from sparseswaps import data
from sparseswaps.errors import UserError
from tiny_models import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_shipped_corpora_match_their_hashes():
    for name in data.CORPORA:
        assert data.corpus_file(name).is_file()


def test_a_modified_corpus_is_refused(tmp_path, monkeypatch):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text("changed\r\n")
    monkeypatch.setattr(data, "DATA_DIR", tmp_path)
    with pytest.raises(UserError, match="was modified"):
        data.corpus_file("ptb")


def test_wikitext_rows_follow_the_hugging_face_split():
    text = data.evaluation_text("wikitext2")
    assert text.startswith("\n\n = Robert Boulter = \n")   # first row (a lone space) becomes ""


def test_calibration_follows_wandas_sampler(tokenizer):
    first = data.calibration_windows(tokenizer, 5, 32, seed=0)
    again = data.calibration_windows(tokenizer, 5, 32, seed=0)
    other = data.calibration_windows(tokenizer, 5, 32, seed=1)
    assert first.input_ids.shape == (5, 32)
    assert (first.input_ids == again.input_ids).all() and not (first.input_ids == other.input_ids).all()


def test_too_short_corpus_gives_a_clear_error(tokenizer):
    with pytest.raises(UserError, match="no calibration document is longer than --seqlen"):
        data.calibration_windows(tokenizer, 2, 10**7)
    with pytest.raises(UserError, match="fewer than one window"):
        data.evaluation_windows("ptb", tokenizer, 10**8)


def test_bos_per_window(tokenizer):
    windows = data.evaluation_windows("wikitext2", tokenizer, 16, bos_per_window=True, max_windows=3)
    assert (windows.input_ids[:, 0] == tokenizer.bos_token_id).all() and windows.input_ids.shape == (3, 16)
