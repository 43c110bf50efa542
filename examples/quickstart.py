"""mmprefix in one screen: a frozen BLIP-VQA model learns to give one fixed answer, through a prefix only.

Runs offline in seconds on a tiny random-weight BLIP built from a config. With real weights, replace the
config by ``BlipForQuestionAnswering.from_pretrained("Salesforce/blip-vqa-base")``; the rest is unchanged.
"""

import tempfile

import torch
from transformers import BlipConfig, BlipForQuestionAnswering

from mmprefix import PrefixConfig, add_prefix, load_prefix

torch.manual_seed(0)
tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
config = BlipConfig(
    vision_config=dict(tiny, image_size=64, patch_size=16, initializer_range=0.02),
    text_config=dict(tiny, vocab_size=100, bos_token_id=3, eos_token_id=2, sep_token_id=2, pad_token_id=0),
)
base = BlipForQuestionAnswering(config).eval()
state = {k: v.clone() for k, v in base.state_dict().items()}

model = add_prefix(base, PrefixConfig(num_virtual_tokens=8))
model.print_trainable_parameters()

images = torch.randn(8, 3, 64, 64)
questions = torch.randint(4, 100, (8, 6))
answer = torch.tensor([[3, 42, 17, 2]])  # [DEC] 42 17 [SEP]: the answer we teach
batch = dict(pixel_values=images, input_ids=questions, labels=answer.expand(8, -1))

optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.3)
model.train()
for step in range(61):
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step % 20 == 0:
        print(f"step {step:2d}  loss {loss.item():.3f}")
model.eval()

with torch.no_grad():
    tuned = model.generate(pixel_values=images, input_ids=questions, max_new_tokens=4, num_beams=3)
    with model.disable_prefix():
        frozen = model.generate(pixel_values=images, input_ids=questions, max_new_tokens=4, num_beams=3)
print("tuned answers: ", tuned[:2].tolist())
print("frozen answers:", frozen[:2].tolist())
assert (tuned[:, 1:3] == answer[:, 1:3]).all(), "the prefix alone taught the frozen model the answer"

with tempfile.TemporaryDirectory() as out:
    model.save_prefix(out)
    reloaded = load_prefix(BlipForQuestionAnswering(config).eval(), out)
    reloaded.base_model.load_state_dict(state)  # the same frozen weights, as from_pretrained would give
    with torch.no_grad():
        again = reloaded.generate(pixel_values=images, input_ids=questions, max_new_tokens=4, num_beams=3)
assert torch.equal(again, tuned), "a saved and reloaded prefix must generate the same answers"
assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items()), "base weights stayed frozen"
print("saved, reloaded, same answers; base weights untouched")
