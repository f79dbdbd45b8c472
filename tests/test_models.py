"""Model loading: the check that refuses a GGUF tokenizer rebuilt without its merges, and --tokenizer."""
from pathlib import Path

import pytest
from tiny_models import tiny_tokenizer

from sparseswaps.errors import UserError
from sparseswaps.models import check_subword_tokenizer, load_model


def test_a_subword_tokenizer_passes_and_a_character_level_one_is_refused():
    check_subword_tokenizer(tiny_tokenizer(vocab_size=2000), Path("model.gguf"))
    # Trained with no room for merges: one token per character, as transformers 5.17 rebuilds Gemma-3's.
    characters = tiny_tokenizer(vocab_size=100)
    with pytest.raises(UserError, match="without its merges.*--tokenizer"):
        check_subword_tokenizer(characters, Path("model.gguf"))


def test_tokenizer_override_is_for_gguf_files_only(tmp_path):
    with pytest.raises(UserError, match="a Hugging Face folder brings its own"):
        load_model(str(tmp_path), tokenizer=str(tmp_path))


def test_default_model_with_its_tokenizer_from_a_folder(tmp_path):
    """--tokenizer swaps in a folder's tokenizer (here the model's own, saved) and records it."""
    try:
        model, tokenizer, _ = load_model(None)
    except UserError as error:
        pytest.skip(str(error))
    tokenizer.save_pretrained(tmp_path / "tok")
    _, replaced, info = load_model(None, tokenizer=str(tmp_path / "tok"))
    assert info["tokenizer"] == str(tmp_path / "tok")
    text = "Robert Boulter is an English actor"
    assert replaced(text)["input_ids"] == tokenizer(text)["input_ids"]
    with pytest.raises(UserError, match="is not a folder"):
        load_model(None, tokenizer=str(tmp_path / "missing"))
