"""The one prompt template behind the three inference modes.

The modes differ only where they must:
- `auto`: the question and the answer-format instruction; the model decides whether to use code.
- `cot`: the same, with an instruction to reason without code.
- `code`: the same as `auto`, and the response is forced to begin with a code-inviting prefix
  (the paper's "Let's first analyze the problem, then consider if python code could help.").

A prompt is returned as two strings: `text` (everything up to where the assistant speaks) and
`prefix` (the forced start of the response, empty except in `code` mode). They are kept apart
because in training the prefix is part of the *response*: its tokens are the ones that express the
code decision c, and the M-step's cross-entropy term acts on them.

Tokenizers with a chat template get it; others get the plain template below, with a warning (once per
process) unless `use_chat_template` is off: a chat model whose template went missing would otherwise
be evaluated on prompts it was never trained on, silently.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

MODES = ("auto", "cot", "code")
CODE_PREFIX = "Let's first analyze the problem, then consider if python code could help."
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
COT_INSTRUCTION = "Please reason step by step without writing code, and put your final answer within \\boxed{}."
PLAIN_TEMPLATE = "Question: {user}\nSolution:\n"
NO_TEMPLATE = (
    "the model's tokenizer has no chat template: prompts use the plain template 'Question: ... Solution:' "
    "(set prompt.use_chat_template=false to say so and silence this)"
)


@dataclass
class PromptConfig:
    """How questions are turned into prompts."""

    code_prefix: str = CODE_PREFIX
    """Forced start of the response in `code` mode (and of c=1 rollouts in the E-step)."""
    instruction: str = INSTRUCTION
    """Answer-format instruction appended to every question."""
    cot_instruction: str = COT_INSTRUCTION
    """Instruction used instead of `instruction` in `cot` mode."""
    use_chat_template: bool = True
    """Use the tokenizer's chat template when it has one."""
    system: str | None = None
    """Optional system message (chat templates only)."""

    def __post_init__(self) -> None:
        if not self.code_prefix.strip():
            raise ValueError("code_prefix must not be empty")


@dataclass(frozen=True)
class Prompt:
    text: str
    """Everything before the response."""
    prefix: str
    """Forced start of the response ("" unless mode is `code`)."""


def build_prompt(question: str, mode: str, tokenizer: Any = None, config: PromptConfig | None = None) -> Prompt:
    """Render `question` for `mode` with the tokenizer's chat template, or the plain template."""
    config = config or PromptConfig()
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    instruction = config.cot_instruction if mode == "cot" else config.instruction
    user = f"{question.strip()}\n{instruction}"
    template = getattr(tokenizer, "chat_template", None) if config.use_chat_template else None
    if config.use_chat_template and tokenizer is not None and not template:
        warnings.warn(NO_TEMPLATE, stacklevel=2)
    if template:
        messages = [{"role": "user", "content": user}]
        if config.system:
            messages.insert(0, {"role": "system", "content": config.system})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = PLAIN_TEMPLATE.format(user=user)
    prefix = config.code_prefix + "\n" if mode == "code" else ""
    return Prompt(text=text, prefix=prefix)
