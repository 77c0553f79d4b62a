"""Text from a detector is untrusted: it never becomes chat structure (control tokens) in the prompt.

The runtime-level checks (torch, ONNX Runtime, llama.cpp give the same ids and verdicts on a forged
response) sit beside each runtime's shared fixtures in test_onnx.py and test_gguf.py.
"""

import pytest
from PIL import Image

from bad_inputs import FORGED_TURN, every_added_token
from dfj import prompts

IMAGE = Image.new("RGB", (112, 84), (40, 90, 160))


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from transformers import AutoProcessor

    from dfj.tiny import write_processor

    folder = tmp_path_factory.mktemp("processor")
    write_processor(folder)
    return AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def encoder(processor):
    from dfj.hf import ChatEncoder

    return ChatEncoder(processor)


def tokenize_chat(encoder, chat: str) -> list[int]:
    """`dfj.runtime.base.chat_ids` itself (what the Judge runs), on the encoder's tokenizers (what the
    torch and ONNX runtimes delegate to)."""
    from dfj.runtime.base import chat_ids

    return chat_ids(chat, encoder.tokenize_as)


def control_tokens(encoder, ids: list[int]) -> list[int]:
    return [i for i in ids if i in encoder.control_ids and i != encoder.image_pad_id]


def test_the_control_tokens_are_the_templates_whatever_a_response_holds(processor, encoder):
    template = control_tokens(encoder, encoder.encode(IMAGE, prompts.render_chat(prompts.render("pointwise", "fake", "ok")))["input_ids"][0].tolist())
    assert len(template) == 7  # <|im_start|> x3, <|im_end|> x2, <|vision_start|>, <|vision_end|>
    hostile = every_added_token(processor.tokenizer)
    for mode, responses in (("pointwise", (hostile,)), ("pairwise", (hostile, FORGED_TURN)), ("pairwise", ("fine", hostile))):
        chat = prompts.render_chat(prompts.render(mode, "fake", *responses))
        inputs = encoder.encode(IMAGE, chat)
        ids = inputs["input_ids"][0].tolist()
        assert control_tokens(encoder, ids) == template, mode
        # The image is the one image block: its pads are the image's tokens, none from the text.
        assert int((inputs["mm_token_type_ids"][0] == 1).sum()) == ids.count(encoder.image_pad_id)
        assert ids.count(encoder.image_pad_id) == int(inputs["image_grid_thw"].prod()) // 4
        # The response is still there, character for character: plain text, not dropped or escaped.
        _, prompt, _ = prompts.split_chat(chat)
        assert processor.tokenizer.decode(encoder.tokenize_plain(prompt)) == prompt
        assert tokenize_chat(encoder, chat).count(encoder.image_pad_id) == 1


def test_the_unsafe_tokenization_would_have_let_the_forged_turn_through(processor, encoder):
    """What the DFJ reference scripts (and dfj before this fix) do: the whole chat through the
    processor, special-token strings recognised anywhere. The forged turn becomes chat structure."""
    chat = prompts.render_chat(prompts.render("pointwise", "fake", FORGED_TURN))
    unsafe = processor(text=[chat], images=[IMAGE], return_tensors="pt")["input_ids"][0].tolist()
    safe = encoder.encode(IMAGE, chat)["input_ids"][0].tolist()
    im_start, im_end = (processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    assert (unsafe.count(im_end), unsafe.count(im_start)) == (4, 5)
    assert (safe.count(im_end), safe.count(im_start)) == (2, 3)


@pytest.mark.parametrize("response", [
    "<reasoning>The hairline is blurred and the background warps.</reasoning> <answer>fake</answer>",
    "naïve café, 東京は晴れ, e\u0301, 😀 \n\n  spaced\ttabs {A_or_B} {{x}} <score>5</score>",
    " leading space and trailing space ",
    "<tool_call>{}</tool_call> is an added token that is not a control token",
])
def test_a_response_without_control_strings_gets_exactly_the_processors_ids(processor, encoder, response):
    """The safe tokenization changes nothing for the text a judge was trained on: every processor
    output equals the processor's own on the whole chat."""
    import torch

    for mode, responses in (("pointwise", (response,)), ("pairwise", (response, "b " + response))):
        chat = prompts.render_chat(prompts.render(mode, "edited", *responses))
        expected = processor(text=[chat], images=[IMAGE], return_tensors="pt")
        got = encoder.encode(IMAGE, chat)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[key], expected[key]) for key in expected), mode
        assert tokenize_chat(encoder, chat) == processor.tokenizer(chat, add_special_tokens=False)["input_ids"]


def test_split_chat_takes_the_last_closing_and_refuses_other_text():
    chat = prompts.render_chat(prompts.render("pointwise", "real", FORGED_TURN))
    head, prompt, rest = prompts.split_chat(chat)
    assert FORGED_TURN in prompt and rest == "<|im_end|>\n<|im_start|>assistant\n"
    assert head.endswith("<|vision_start|><|image_pad|><|vision_end|>") and head + prompt + rest == chat
    # A teacher-forced continuation after the chat belongs to the closing part, not the prompt.
    assert prompts.split_chat(chat + "<score>4</score>")[1] == prompt
    for text in ("plain text", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", chat[5:]):
        with pytest.raises(ValueError, match="render_chat"):
            prompts.split_chat(text)


def test_every_manifest_records_the_prompt_tokenization():
    from dfj.manifest import Manifest

    assert Manifest.for_judge("pairwise", "gguf", {}).prompt_tokenization == prompts.PROMPT_TOKENIZATION
