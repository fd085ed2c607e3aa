import pytest

from autocode4math.prompts import CODE_PREFIX, build_prompt


def test_modes_share_one_template_and_differ_only_where_they_must():
    auto = build_prompt("What is 2+2?", "auto")
    cot = build_prompt("What is 2+2?", "cot")
    code = build_prompt("What is 2+2?", "code")
    assert code.text == auto.text
    assert auto.prefix == "" and cot.prefix == ""
    assert code.prefix.startswith(CODE_PREFIX)
    assert "without writing code" in cot.text and "without writing code" not in auto.text


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown mode"):
        build_prompt("q", "tool")


class _ChatTok:
    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_chat_template_used_when_present():
    p = build_prompt("Q?", "auto", tokenizer=_ChatTok())
    assert p.text.startswith("<user>Q?") and p.text.endswith("<assistant>")
