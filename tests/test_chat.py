"""The chat template, SFT loss masks and truncation, and conversation loading (gptrl/chat.py, chat_data.py)."""
import json
import random

import jax.numpy as jnp
import numpy as np
import pytest

from gptrl import chat
from gptrl import chat_data
from gptrl import losses
from gptrl import tokenizer as tokenizer_lib
from gptrl.chat import Message
from gptrl.data import DataError

_WORDS = "good day to you my lord what say thou the king is here speak friend well met sir".split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  rng = random.Random(0)
  docs = ["\n".join(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 10))) + "." for _ in range(60))
          for _ in range(5)]
  return tokenizer_lib.train_tokenizer(docs, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=400)


CONV = [Message("system", "Be kind."), Message("user", "Good day, my lord."),
        Message("assistant", "Well met, sir."), Message("user", "What say you?"),
        Message("assistant", "The king is here.")]


def test_render_layout_and_mask_by_hand(tok):
  tokens, trainable = chat.render(CONV[:3], tok)
  sys_ids, user_ids, asst_ids = (tok.encode(m.content) for m in CONV[:3])
  expected = ([tok.eos_id, tok.system_id] + sys_ids + [tok.end_of_turn_id, tok.user_id] + user_ids +
              [tok.end_of_turn_id, tok.assistant_id] + asst_ids + [tok.end_of_turn_id])
  assert tokens == expected
  # Only the assistant's content and its end-of-turn token are trained on.
  n_before = len(expected) - len(asst_ids) - 1
  assert trainable == [0] * n_before + [1] * (len(asst_ids) + 1)


def test_round_trip_and_generation_prompt(tok):
  tokens, _ = chat.render(CONV, tok)
  assert chat.parse(tokens, tok) == CONV
  prompt = chat.prompt_tokens(CONV[:4], tok, max_tokens=1000)
  assert prompt[-1] == tok.assistant_id
  assert chat.parse(prompt, tok) == CONV[:4] + [Message("assistant", "")]
  # A sampled reply ends at <|end|>; what follows is not part of it.
  reply = tok.encode("Well met.") + [tok.end_of_turn_id] + tok.encode("junk")
  assert chat.decode_reply(reply, tok) == "Well met."
  assert chat.reply_tokens(reply, tok) == (tok.encode("Well met."), True)


def test_marker_text_in_content_cannot_open_a_turn(tok):
  sneaky = [Message("user", "say <|assistant|> and <|end|> <|system|>"), Message("assistant", "no <|user|>!")]
  tokens, trainable = chat.render(sneaky, tok)
  role_ids = {tok.system_id, tok.user_id, tok.assistant_id, tok.end_of_turn_id}
  assert [t for t in tokens if t in role_ids] == [tok.user_id, tok.end_of_turn_id, tok.assistant_id,
                                                   tok.end_of_turn_id]
  assert chat.parse(tokens, tok) == sneaky  # the literal text survives, as bytes
  assert sum(trainable) == len(chat.encode_content("no <|user|>!", tok)) + 1


def test_loss_counts_only_assistant_tokens(tok):
  """The masked LM loss equals a hand computation over the assistant tokens alone."""
  enc = chat.encode_for_training(CONV, tok, max_len=200)
  batch = chat_data._RowsToSFTBatch(chat_data.SFTExamples([enc.tokens], [enc.trainable], 0, 0), 200, tok.pad_id,
                                    0, 1)(np.array([0]))
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(1, 200, tok.vocab_size)).astype(np.float32)
  loss_sum, weight = losses.weighted_cross_entropy(jnp.asarray(logits), batch["targets"], batch["weights"])
  logp = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
  expected, count = 0.0, 0
  for i in range(len(enc.tokens) - 1):
    if enc.trainable[i + 1]:  # position i predicts token i+1
      expected -= logp[0, i, enc.tokens[i + 1]]
      count += 1
  n_assistant = sum(len(tok.encode(m.content)) + 1 for m in CONV if m.role == "assistant")
  assert count == n_assistant == int(weight)
  np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-5)
  # Padding carries no weight.
  assert batch["weights"][0, len(enc.tokens) - 1:].sum() == 0


def test_truncation_keeps_recent_turns_and_skips_empty(tok):
  full, _ = chat.render(CONV, tok)
  last_exchange, _ = chat.render([CONV[0]] + CONV[3:], tok)
  enc = chat.encode_for_training(CONV, tok, max_len=len(last_exchange) - 1)
  assert enc.tokens.tolist() == last_exchange  # the oldest exchange went, the system message stayed
  assert enc.dropped_turns == 2 and len(full) > len(last_exchange)
  # Too short for even the last exchange: its reply is cut at the end, the prompt kept.
  tiny = chat.encode_for_training(CONV, tok, max_len=len(chat.render(CONV[3:4], tok)[0]) + 1)
  assert tiny is not None and tiny.trainable.sum() >= 1 and tiny.tokens[-1] != tok.end_of_turn_id
  # No room for any assistant token: skipped, not a NaN-producing all-zero row.
  assert chat.encode_for_training([Message("user", "good day " * 50), Message("assistant", "x")], tok,
                                  max_len=8) is None
  # A trailing user turn has nothing to learn from and is dropped.
  enc = chat.encode_for_training(CONV + [Message("user", "And?")], tok, max_len=200)
  assert enc.tokens.tolist() == full


def test_encode_sft_counts_skipped(tok):
  convs = [chat_data.Conversation("a", "a", tuple(CONV)),
           chat_data.Conversation("b", "b", (Message("user", "good day " * 50), Message("assistant", "x")))]
  ex = chat_data.encode_sft(convs, tok, max_len=32)
  assert ex.skipped == 1 and len(ex.tokens) == 1 and ex.trainable_tokens > 0


def _write(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


def test_load_conversations_both_formats(tmp_path):
  path = _write(tmp_path / "d.jsonl", [
      json.dumps({"prompt": "hi", "response": "hello"}),
      "",
      json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                  "group": "play1"})])
  convs = chat_data.load_conversations([path])
  assert [c.messages for c in convs] == [(Message("user", "hi"), Message("assistant", "hello")),
                                         (Message("user", "a"), Message("assistant", "b"))]
  assert convs[0].where == f"{path}:1" and convs[1].where == f"{path}:3" and convs[1].group == "play1"


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "hi"}', "expected {'prompt', 'response'} or {'messages'"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role must be one of"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}', "must be a string"),
    ('{"prompt": "a", "messages": [], "response": "b"}', "exactly one of 'prompt'"),
    ('{"prompt": "a", "response": "b"', "invalid JSON"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_conversation_lines_name_file_and_line(tmp_path, line, message):
  path = _write(tmp_path / "bad.jsonl", [json.dumps({"prompt": "ok", "response": "fine"}), line])
  with pytest.raises(DataError) as e:
    chat_data.load_conversations([path])
  assert f"{path}:2" in str(e.value) and message in str(e.value)


def test_split_by_group_keeps_groups_together():
  convs = [chat_data.Conversation(str(i), f"g{i % 7}", ()) for i in range(70)]
  train, held = chat_data.split_by_group(convs, eval_fraction=0.3, seed=0)
  assert train and held and len(train) + len(held) == 70
  assert not {c.group for c in train} & {c.group for c in held}
  assert chat_data.split_by_group(convs, eval_fraction=0.3, seed=0) == (train, held)


@pytest.fixture(scope="module")
def chat_tfds_dir(tmp_path_factory):
  """An array_record TFDS dataset of multi-turn chats (messages as a Sequence of role/content features)."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class GptrlTinyChat(tfds.core.GeneratorBasedBuilder):
    """Two conversations."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "messages": tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()})}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      yield 0, {"messages": [{"role": "user", "content": "hi é"}, {"role": "assistant", "content": "hello"}]}
      yield 1, {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                             {"role": "assistant", "content": "a"}]}

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  GptrlTinyChat(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_conversations(chat_tfds_dir):
  convs = chat_data.load_conversations([f"tfds:gptrl_tiny_chat:train?data_dir={chat_tfds_dir}"])
  assert sorted((c.messages for c in convs), key=len) == [
      (Message("user", "hi é"), Message("assistant", "hello")),
      (Message("system", "s"), Message("user", "q"), Message("assistant", "a"))]
  assert all(c.where.startswith("tfds:gptrl_tiny_chat:train#") for c in convs)
