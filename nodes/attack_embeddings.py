"""Embedding attacks as nodes: MemoRa Textual Inversion (Pham et al. 2023) and MemoRa Adversarial Prompt (in the
spirit of UnlearnDiffAtk, Zhang et al. 2024). The methods are ``memora.attacks``; the ComfyUI plumbing is
``_embedding_host``; docs/attack-embeddings.md describes both."""

from __future__ import annotations

import json

import torch
from comfy_api.latest import io

import folder_paths

import memora
from memora.attacks import adversarial_prompt as _ap
from memora.attacks import common as _common
from memora.attacks import textual_inversion as _ti
from memora.lora import fingerprint
from memora.lora import save as _save
from . import _embedding_host as _eh
from . import _host, _schema
from . import _train_host as _th
from . import _train_model as _tm

TI_NAME = "MemoRa Textual Inversion"
AP_NAME = "MemoRa Adversarial Prompt"


def embeddings_root() -> str:
    """ComfyUI's first embeddings folder (models/embeddings), where ``embedding:<name>`` looks."""
    return folder_paths.get_folder_paths("embeddings")[0]


class _Progress:
    def __init__(self, stage: str, total: int):
        self.bar = _host.StageProgress(stage, total)

    def __call__(self, step: int, loss: float) -> None:
        self.bar(step)


class MemoRaTextualInversion(_schema.MemoRaNode):
    """Textual inversion as a recovery attack (Pham et al. 2023, 'Circumventing Concept Erasure Methods For
    Text-to-Image Generative Models'): learns the embedding vector(s) of a NEW token on the attacker's images of the
    erased concept, with the (unlearned) model and the text encoder frozen, by the model's own denoising loss. If
    the erasure only cut the word from the model, the new token draws the concept again. Outputs the template with
    the token as CONDITIONING, the same prompt in ComfyUI's embedding:<name> syntax, and the embedding file (models/
    embeddings/<save_name>_<counter>_.safetensors, never overwriting) that stock CLIP Text Encode loads. The input
    model and CLIP are not modified. Cost table: '<node>: cost'."""

    @classmethod
    def define_schema(cls):
        return _schema.node(cls, TI_NAME, "attacks", is_output_node=True, inputs=[
            io.Model.Input("model", tooltip="The model to attack (the UNLEARNED model), frozen; not modified."),
            io.Clip.Input("clip", tooltip="The model's text encoder (frozen; not modified)."),
            io.Latent.Input("latents", tooltip="VAE latents of the attacker's images of the erased concept."),
            io.String.Input("token", default=_ti.DEFAULT_TOKEN,
                            tooltip="The new word to learn (recorded in the file); must not exist in the "
                                    "tokenizer's vocabulary."),
            io.String.Input("init_word", default="object",
                            tooltip="The vectors start from this word's token embedding(s)."),
            io.String.Input("template", default=_ti.DEFAULT_TEMPLATE,
                            tooltip="The training prompt; '{}' is where the learnt token goes."),
            io.Int.Input("num_vectors", default=1, min=1, max=16, tooltip="Vectors the token is made of."),
            io.Int.Input("steps", default=500, min=0, max=100000,
                         tooltip="Optimisation steps (at least 1; 0 is refused)."),
            io.Float.Input("learning_rate", default=5e-3, min=1e-6, max=1.0, step=1e-4, round=1e-6,
                           tooltip="Adam learning rate on the vectors (constant, no weight decay)."),
            io.Int.Input("batch_size", default=4, min=1, max=256, tooltip="Images per step."),
            io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                         tooltip="Seeds every random draw (images, timesteps, noise)."),
            io.String.Input("save_name", default="memora/concept",
                            tooltip="File prefix under models/embeddings; the prompt output names the file as "
                                    "embedding:<save_name>_<counter>_. Empty: do not save."),
        ], outputs=[
            io.Conditioning.Output(display_name="positive",
                                   tooltip="The template with the learnt token, for KSampler."),
            io.String.Output(display_name="prompt",
                             tooltip="The template with embedding:<file>, for a stock CLIP Text Encode."),
            _schema.filename_output("The saved embedding relative to models/embeddings (empty when not saved)."),
        ])

    @classmethod
    def execute(cls, model, clip, latents, token, init_word, template, num_vectors, steps, learning_rate,
                batch_size, seed, save_name) -> io.NodeOutput:
        what = TI_NAME
        recipe = _ti.TIRecipe(steps=steps, learning_rate=learning_rate, batch_size=batch_size,
                              num_vectors=num_vectors, seed=seed).validate()
        _eh.check_model(model, what)
        samples = _eh.check_latent_fits(model, latents.get("samples") if isinstance(latents, dict) else None, what)
        key, tok, enc = _eh.text_encoder(clip, what)
        token = _ti.check_token(token, tok.tokenizer.get_vocab())
        _ti.check_template(template)
        table = _eh.token_table(enc)
        init = _ti.init_vectors(table[_eh.word_ids(tok, init_word, what, "init_word")], recipe.num_vectors)
        save = (save_name or "").strip()
        if save:
            _save.check_save_target(embeddings_root(), save)
        live = _eh.LivePrompt(clip, key, _ti.fill_template(template, "{}"), recipe.num_vectors, table.shape[1], what)
        first = _eh.conditioning(clip, live.with_vectors(init))
        counter = _common.CallCounter()
        progress = _Progress("textual inversion", recipe.steps)
        with _eh.differentiable(model, clip) as (unet, te, holder):
            def loop(predict, lat, schedule):
                return _ti.train_embedding(predict, lambda v: _eh.encode_live(te, live, v), init.to(lat.device),
                                           lat, schedule, recipe, counter=counter, on_step=progress)

            result = _eh.run_on_model(unet, holder, first, samples, recipe.seed,
                                      min(recipe.batch_size, samples.shape[0]), loop)
        seconds = counter.seconds
        positive = _eh.conditioning(clip, live.with_vectors(result.vectors))
        filename, name = "", token
        if save:
            meta = {"memora.attack": "textual_inversion", "memora.token": token, "memora.init_word": init_word,
                    "memora.template": template, "memora.recipe": json.dumps(recipe.to_dict(), sort_keys=True),
                    "memora.final_loss": repr(result.losses[-1]), "memora.base_model_hash": _tm.base_model_hash(model),
                    "memora.training_latents": json.dumps({"shape": list(samples.shape),
                                                           "hash": fingerprint.tensor_hash(samples)}),
                    "memora.version": memora.__version__}
            path = _save.save_safetensors_atomic(_ti.embedding_tensors(result.vectors, tok.embedding_key),
                                                 embeddings_root(), save, meta)
            filename = _save.name_in_root(embeddings_root(), path)
            name = filename[:-len(".safetensors")]
        prompt = _ti.fill_template(template, f"embedding:{name}")
        table_cost = _common.cost_table(TI_NAME, "textual inversion", _common.WEIGHTS_AND_GRADIENTS, counter,
                                        samples.shape[0], seconds)
        # the model's denoising loss on the images with the same fixed draws (not counted as attack cost)
        loss_init = _th.recipe_loss(model, first, samples, seed=int(seed) % (2 ** 31))
        loss_learnt = _th.recipe_loss(model, positive, samples, seed=int(seed) % (2 ** 31))
        table_loss = {"title": f"{TI_NAME}: loss", "columns": ["loss_init_word", "loss_learnt", "steps"],
                      "rows": [[loss_init, loss_learnt, len(result.losses)]]}
        return io.NodeOutput(positive, prompt, filename, ui=_host.publish_scores([table_cost, table_loss]))


class MemoRaAdversarialPrompt(_schema.MemoRaNode):
    """An adversarial prompt prefix in the spirit of UnlearnDiffAtk (Zhang et al. 2024): optimises num_tokens tokens
    put before the prompt so that the (unlearned) model's own denoising loss on the target images is minimal (the
    diffusion model as its own classifier). discrete: the prefix is projected onto the nearest whole-word vocabulary
    tokens at every step, the gradient updating its continuous copy (straight-through, as PEZ does); the result is
    text. continuous (a stated variant): free embedding vectors, not a text prompt. Reports the denoising loss of the
    plain and the adversarial prompt on the images with the same fixed draws, and the cost table '<node>: cost'.
    The input model and CLIP are not modified."""

    @classmethod
    def define_schema(cls):
        return _schema.node(cls, AP_NAME, "attacks", is_output_node=True, inputs=[
            io.Model.Input("model", tooltip="The model to attack (the UNLEARNED model), frozen; not modified."),
            io.Clip.Input("clip", tooltip="The model's text encoder (frozen; not modified)."),
            io.Latent.Input("latents", tooltip="VAE latents of the target images (the concept)."),
            io.String.Input("prompt", default="a photo of a star", multiline=True,
                            tooltip="The prompt the adversarial tokens are put in front of."),
            io.Int.Input("num_tokens", default=5, min=1, max=32, tooltip="Tokens in the prefix (UnlearnDiffAtk: 5)."),
            io.Int.Input("steps", default=40, min=0, max=100000,
                         tooltip="Optimisation steps (UnlearnDiffAtk: 40; at least 1, 0 is refused)."),
            io.Combo.Input("mode", options=list(_ap.MODES), default=_ap.DISCRETE,
                           tooltip="discrete: a text prompt (projection to vocabulary tokens); continuous: free "
                                   "embedding vectors (a stated variant, not text)."),
            io.Float.Input("learning_rate", default=1e-2, min=1e-6, max=10.0, step=1e-3, round=1e-6,
                           tooltip="Adam learning rate on the prefix vectors."),
            io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                         tooltip="Seeds the start tokens and every draw (images, timesteps, noise)."),
        ], outputs=[
            io.Conditioning.Output(display_name="positive", tooltip="The adversarial prompt's conditioning."),
            io.String.Output(display_name="prompt",
                             tooltip="discrete: the adversarial prompt (prefix + prompt), which CLIP Text Encode "
                                     "turns into the same conditioning; continuous: the nearest tokens' reading "
                                     "only."),
        ])

    @classmethod
    def execute(cls, model, clip, latents, prompt, num_tokens, steps, mode, learning_rate, seed) -> io.NodeOutput:
        what = AP_NAME
        samples_in = latents.get("samples") if isinstance(latents, dict) else None
        batch = min(4, int(samples_in.shape[0])) if isinstance(samples_in, torch.Tensor) and samples_in.dim() else 4
        recipe = _ap.APRecipe(num_tokens=num_tokens, steps=steps, mode=mode, learning_rate=learning_rate,
                              batch_size=max(batch, 1), seed=seed).validate()
        _eh.check_model(model, what)
        samples = _eh.check_latent_fits(model, samples_in, what)
        key, tok, enc = _eh.text_encoder(clip, what)
        ids, words = _ap.word_candidates(tok.tokenizer.get_vocab())
        table = _eh.token_table(enc)[ids]
        live = _eh.LivePrompt(clip, key, f"{{}} {prompt}", recipe.num_tokens, table.shape[1], what)
        plain = _eh.text_conditioning(clip, prompt)
        counter = _common.CallCounter()
        progress = _Progress("adversarial prompt", recipe.steps)
        with _eh.differentiable(model, clip) as (unet, te, holder):
            def loop(predict, lat, schedule):
                return _ap.optimise_prefix(predict, lambda v: _eh.encode_live(te, live, v), table.to(lat.device),
                                           lat, schedule, recipe, counter=counter, on_step=progress)

            result = _eh.run_on_model(unet, holder, plain, samples, recipe.seed, recipe.batch_size, loop)
        seconds = counter.seconds
        text = f"{_ap.prefix_text(words, result.candidates)} {prompt}".strip()
        if recipe.mode == _ap.DISCRETE:
            positive = _eh.text_conditioning(clip, text)
        else:
            positive = _eh.conditioning(clip, live.with_vectors(result.vectors))
        loss_plain = _th.recipe_loss(model, plain, samples, seed=int(seed) % (2 ** 31))
        loss_adv = _th.recipe_loss(model, positive, samples, seed=int(seed) % (2 ** 31))
        cost = _common.cost_table(AP_NAME, f"adversarial prompt ({recipe.mode})", _common.WEIGHTS_AND_GRADIENTS,
                                  counter, samples.shape[0], seconds)
        loss_table = {"title": f"{AP_NAME}: loss", "columns": ["loss_plain", "loss_adversarial", "mode"],
                      "rows": [[loss_plain, loss_adv, recipe.mode]]}
        return io.NodeOutput(positive, text, ui=_host.publish_scores([cost, loss_table]))


NODES = [MemoRaTextualInversion, MemoRaAdversarialPrompt]
