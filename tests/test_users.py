"""User embeddings: the learned table, interpolation, the batch check, and the vision-language encoder on a tiny
LLaVA written to a temporary directory and loaded through the same path as a hub model (also from the command
line, into shards)."""

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from lightning_pref.data_commands import data_main
from lightning_pref.datamodules.users import UserPreferenceDataModule
from lightning_pref.errors import ConfigError, DataError
from lightning_pref.toy.users import write_rendered_user_pairs
from lightning_pref.users import (
    UserExample,
    UserTable,
    VisionLanguageUserEncoder,
    check_user_embeddings,
    interpolate_users,
)

TEXT_WIDTH, TEXT_LAYERS = 24, 4
#: a chat template that writes the text items and one image token per image, then a generation prompt
CHAT_TEMPLATE = (
    "{% for message in messages %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% else %}{{ item['text'] }} {% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}describe the user : {% endif %}"
)


def write_tiny_vlm(path, chat_template=CHAT_TEMPLATE):
    """A LLaVA of a 2-layer CLIP vision tower and a 4-layer Llama (width 24), with a word-level tokenizer."""
    words = "<unk> <pad> <image> here are image pairs a user compared : for each prompt , the they preferred then"
    words += " one did not . describe what this prefers preferred: dispreferred: red green circle square prompt:"
    vocab = {word: index for index, word in enumerate(dict.fromkeys(words.split()))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", extra_special_tokens={"image_token": "<image>"}
    )
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8
    )
    text = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=TEXT_WIDTH,
        intermediate_size=48,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=vocab["<pad>"],
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab["<image>"])
    LlavaForConditionalGeneration(config).save_pretrained(path)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=chat_template,
        num_additional_image_tokens=1,
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return write_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"))


def examples(colors):
    def square(color):
        image = np.zeros((16, 16, 3), np.uint8)
        image[4:12, 4:12] = {"red": (220, 40, 40), "green": (40, 170, 70)}[color]
        return Image.fromarray(image)

    return [UserExample(f"a {preferred} square", square(preferred), square(other)) for preferred, other in colors]


def test_the_table_holds_one_embedding_per_user_and_refuses_ids_outside_it():
    table = UserTable(num_users=3, tokens=2, dim=4)
    out = table(torch.tensor([2, 0, 2]))
    assert out.shape == (3, 2, 4) and torch.equal(out[0], out[2]) and not torch.equal(out[0], out[1])
    assert torch.equal(out[1].flatten(), table.embeddings.weight[0])
    with pytest.raises(DataError, match="'user_id' holds 3, outside the table's users 0..2"):
        table(torch.tensor([0, 3]))
    with pytest.raises(DataError, match="'user_id' holds -1"):
        table(torch.tensor([-1]))
    with pytest.raises(ConfigError, match="num_users=0"):
        UserTable(0, 1, 1)


def test_interpolation_runs_from_one_user_to_the_other():
    e_a, e_b = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(interpolate_users(e_a, e_b, 0.0), e_a) and torch.equal(interpolate_users(e_a, e_b, 1.0), e_b)
    torch.testing.assert_close(interpolate_users(e_a, e_b, 0.25), 0.75 * e_a + 0.25 * e_b)
    with pytest.raises(ConfigError, match=r"\(2, 3\) and \(3, 2\)"):
        interpolate_users(e_a, e_b.T, 0.5)


@pytest.mark.parametrize(
    "embeddings, message",
    [
        (torch.zeros(2, 3, 5), r"is \(2, 3, 5\), but the module takes \(batch, 4, 5\)"),
        (torch.zeros(2, 4, 5, dtype=torch.long), "is torch.int64, not a float tensor"),
        ([[0.0]], "is list, not a float tensor"),
        (torch.full((2, 4, 5), float("nan")), "holds NaN or infinite"),
    ],
)
def test_a_batch_of_embeddings_of_the_wrong_kind_is_refused_naming_the_field(embeddings, message):
    with pytest.raises(DataError, match="'user_embedding' " + message):
        check_user_embeddings(embeddings, tokens=4, dim=5)
    assert check_user_embeddings(torch.zeros(2, 4, 5), 4, 5).shape == (2, 4, 5)


def test_the_encoder_returns_hidden_states_of_the_last_positions_of_the_users_examples(tiny_vlm):
    encoder = VisionLanguageUserEncoder(str(tiny_vlm), tokens=3)
    assert (encoder.tokens, encoder.dim, encoder.hidden_layer) == (3, TEXT_WIDTH, TEXT_LAYERS // 2)  # the middle layer
    red_lover = examples([("red", "green"), ("red", "green")])
    embedding = encoder.encode(red_lover)
    assert embedding.shape == (3, TEXT_WIDTH) and embedding.dtype == torch.float32
    assert torch.equal(encoder.encode(red_lover), embedding)
    assert not torch.allclose(encoder.encode(examples([("green", "red"), ("green", "red")])), embedding)
    # layer 0 is the input embeddings: the last three positions are the generation prompt's words "the user :"
    words = encoder.processor.tokenizer.convert_tokens_to_ids(["the", "user", ":"])
    first_layer = VisionLanguageUserEncoder(str(tiny_vlm), tokens=3, hidden_layer=0).encode(red_lover)
    assert torch.equal(first_layer, encoder.model.get_input_embeddings().weight[words])
    text = encoder.processor.apply_chat_template(
        encoder.conversation(red_lover), add_generation_prompt=True, tokenize=False
    )
    assert text.count("<image>") == 4 and "Prompt: a red square" in text


def test_the_encoder_refuses_a_processor_without_a_chat_template_and_impossible_shapes(tiny_vlm, tmp_path):
    with pytest.raises(ConfigError, match="has no chat template"):
        VisionLanguageUserEncoder(str(write_tiny_vlm(tmp_path / "plain", chat_template=None)))
    with pytest.raises(ConfigError, match="hidden_layer=9: the model has hidden states 0..4"):
        VisionLanguageUserEncoder(str(tiny_vlm), hidden_layer=9)
    encoder = VisionLanguageUserEncoder(str(tiny_vlm), tokens=400)
    with pytest.raises(ConfigError, match="tokens=400, but the model read only"):
        encoder.encode(examples([("red", "green")]))
    with pytest.raises(ConfigError, match="at least one example"):
        encoder.encode([])


def test_the_command_writes_every_pair_with_its_users_embedding_from_the_encoder(tiny_vlm, tmp_path, capsys):
    write_rendered_user_pairs(tmp_path / "pairs", num_pairs=12, samples_per_shard=6)
    data_main(
        ["user-embeddings", "--in", str(tmp_path / "pairs"), "--out", str(tmp_path / "users")]
        + ["--encoder", str(tiny_vlm), "--examples", "2", "--tokens", "3", "--device", "cpu"]
    )
    assert '"users": 2' in capsys.readouterr().out
    data = UserPreferenceDataModule(
        str(tmp_path / "users"), user_embeddings=True, batch_size=12, num_workers=0, shuffle_buffer=1
    )
    batch = next(iter(data.train_dataloader()))
    assert batch["user_embedding"].shape == (12, 3, TEXT_WIDTH) and set(batch["user_id"].tolist()) == {0, 1}
    for user in (0, 1):
        rows = batch["user_embedding"][batch["user_id"] == user]
        assert (rows == rows[0]).all()  # one embedding per user
    assert not torch.equal(*(batch["user_embedding"][batch["user_id"] == user][0] for user in (0, 1)))
