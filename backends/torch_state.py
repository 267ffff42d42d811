"""The compiled model's state across calls, as mixins of its classes: segment recurrence (recur, run_segments:
evodsl.segments) and decoding (decodable, decode, generate: evodsl.decode), for causal LMs and encoder-decoders.
The forward's hooks that fill the states (EvoModel._enter, _leave) stay with the forward in lower_torch."""
from __future__ import annotations

import torch

from evodsl.decode import DecodeState, pick_next
from evodsl.diagnostics import Diagnostic, EvoError
from evodsl.segments import SegmentState, run_segments


class ModelState:
    """Segments and decoding for EvoModel (it reads the model's _run, _forms, _causal_output, _static_reads,
    _inputs, input_kind, output_shape and graph_name)."""

    # ---------------------------------------------------------------- segments

    def recur(self, input_ids: torch.Tensor, state: SegmentState | None = None,
              attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, SegmentState]:
        """One segment of a long sequence: input_ids [b, n] after the segments `state` has seen (None: the
        first). Returns the output and the state the next segment reads: each memory(xl) attention's last
        mem_len inputs, each memory(rmt) stream's tokens as its writer left them (evodsl.segments)."""
        state = SegmentState() if state is None else state
        out = self._run([input_ids], {"attention_mask": attention_mask}, segments=state)
        state.segments += 1
        state.seen += input_ids.shape[1]
        return out, state

    def run_segments(self, input_ids: torch.Tensor, segment_len: int, state: SegmentState | None = None,
                     grad_segments: int | None = None) -> tuple[torch.Tensor, SegmentState]:
        """input_ids [b, N] in segments of segment_len, each `recur`red with the state of the one before:
        the outputs concatenated, and the final state. grad_segments=k backpropagates through the memory of the
        last k segments only (evodsl.segments.run_segments)."""
        return run_segments(self, input_ids, segment_len, state, grad_segments)

    # ---------------------------------------------------------------- decoding

    def decodable(self) -> str | None:
        """Why this model cannot decode incrementally (generate), or None if it can: its output stream must be
        causal, give next-token logits, and every op must have a step form (cross-attention: over a stream
        computed once, an encoder's)."""
        why = self._not_an_lm()
        if why is not None:
            return why
        for op_id, kv in self._static_reads:
            return f"{op_id} reads stream '{kv}', which grows while decoding (it would be read again each step)"
        length = "m" if len(self._inputs) > 1 else "n"
        if self.output_shape[1] != length:
            return "it does not give next-token logits at every position (input(tokens) ... head(lm))"
        for op_id, form in self._forms:
            if form is None:
                return f"{op_id} has no step form" + (": it carries state from one segment to the next (run it "
                                                      "with model.recur or model.run_segments)"
                                                      if op_id.startswith("memory(") else "")
        return None

    def _not_an_lm(self) -> str | None:
        """Why the model's last output row is not the next token's logits (None if it is): generate without a
        cache needs a causal stream of token ids in and [b, k, vocab] logits out, the last for the last token
        (every position's, or those of the last k positions, slice(last=k): Perceiver AR)."""
        if not self._causal_output:
            return "the model is not causal: every position reads the whole sequence, so there is nothing to extend"
        if self.input_kind != "tokens" or len(self.output_shape) != 3 or (
                self.output_shape[1] not in ("n", "m") and self.output_shape[1] not in self._last_slices):
            return "it does not give next-token logits at every position (input(tokens) ... head(lm))"
        return None

    def decode(self, input_ids: torch.Tensor, state: DecodeState | None = None) -> tuple[torch.Tensor, DecodeState]:
        """Run the next tokens [b, k] after those `state` has seen (None: a fresh state, i.e. a prompt): returns
        their logits [b, k, vocab] and the state after them. A prompt, its pieces one by one (chunked prefill)
        and then one token at a time give the full forward's logits at every position. No padding: every row
        has the same number of tokens."""
        why = self.decodable()
        if why is not None:
            raise EvoError([Diagnostic("E411", f"'{self.graph_name}' cannot decode: {why}", help=_help(why))])
        state = DecodeState() if state is None else state
        out = self._run([input_ids], {}, state=state)
        state.seen += input_ids.shape[1]
        return out, state

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """input_ids [b, n] -> [b, n + max_new_tokens]: greedy by default; with do_sample, a sample at
        `temperature` from the top_k tokens and the top_p nucleus (reproducible with `generator`). A row stops at
        eos_token_id and is padded with it after. One prefill of the prompt, then one step per token; with
        use_cache=False, a whole forward per token instead (no state: for models whose ops have no step form,
        e.g. Perceiver AR's moving window; an ordinary forward is one segment for memory(xl) / memory(rmt))."""
        if not use_cache:
            self._check_lm()
            return self._generate(input_ids, lambda ids: (self(ids), ids), max_new_tokens, do_sample, temperature,
                                  top_k, top_p, eos_token_id, generator, step=self._recompute)
        return self._generate(input_ids, self.decode, max_new_tokens, do_sample, temperature, top_k, top_p,
                              eos_token_id, generator)

    def _check_lm(self) -> None:
        why = self._not_an_lm()
        if why is not None:
            raise EvoError([Diagnostic("E411", f"'{self.graph_name}' cannot generate: {why}")])

    def _recompute(self, nxt: torch.Tensor, ids: torch.Tensor):
        ids = torch.cat([ids, nxt], dim=1)
        return self(ids), ids

    def _generate(self, input_ids, first, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
                  generator, step=None) -> torch.Tensor:
        """One prefill (`first(input_ids)` -> logits, state), then one step per new token (`step(ids, state)`
        -> logits, state; default: decode)."""
        step = self.decode if step is None else step
        logits, state = first(input_ids)
        out, done = [input_ids], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            nxt = pick_next(logits[:, -1], do_sample, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = nxt.masked_fill(done, eos_token_id)
                done |= nxt == eos_token_id
            out.append(nxt[:, None])
            if i + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            logits, state = step(nxt[:, None], state)
        ids = torch.cat(out, dim=1)
        missing = input_ids.shape[1] + max_new_tokens - ids.shape[1]  # every row stopped early
        if missing:
            ids = torch.cat([ids, ids.new_full((ids.shape[0], missing), eos_token_id)], dim=1)
        return ids


class Seq2SeqState:
    """Decoding for an encoder-decoder (EvoSeq2SeqModel): the encoder runs once, at the first step."""

    def decode(self, decoder_input_ids: torch.Tensor, state: DecodeState | None = None,
               input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None):
        """The next target tokens [b, k] after those `state` has seen. The first call (state None) takes the
        source, input_ids [b, n] (and its attention_mask): the encoder runs once, its output and every
        cross-attention's K/V stay in the state. Returns (logits [b, k, vocab], state)."""
        why = self.decodable()
        if why is not None:
            raise EvoError([Diagnostic("E411", f"'{self.graph_name}' cannot decode: {why}", help=_help(why))])
        if state is None:
            if input_ids is None:
                raise EvoError([Diagnostic("E411", "the first decode of an encoder-decoder needs the source",
                                           help="model.decode(decoder_input_ids, input_ids=source_ids)")])
            state = DecodeState()
            state.kept["input_ids"] = _shape_only(input_ids)  # later steps skip the encoder, its only reader
        source = input_ids if not state.seen else state.kept["input_ids"]
        out = self._run([source, decoder_input_ids], {"attention_mask": attention_mask}, state=state)
        state.seen += decoder_input_ids.shape[1]
        return out, state

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor | None = None,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None, attention_mask: torch.Tensor | None = None,
                 decoder_start_token_id: int = 0, use_cache: bool = True) -> torch.Tensor:
        """The target for the source input_ids [b, n]: decoder_input_ids [b, k] (default: one
        decoder_start_token_id, 0 as T5's and Marian's pad; BART starts from 2), then max_new_tokens more, as
        EvoModel.generate (use_cache=False: the whole model runs again for every token). Returns
        [b, k + max_new_tokens]."""
        if decoder_input_ids is None:
            decoder_input_ids = input_ids.new_full((input_ids.shape[0], 1), decoder_start_token_id)
        if not use_cache:
            self._check_lm()
            def step(nxt, ids):
                ids = ids if nxt is None else torch.cat([ids, nxt], dim=1)
                return self(input_ids, ids, attention_mask), ids

            return self._generate(decoder_input_ids, lambda ids: step(None, ids), max_new_tokens, do_sample,
                                  temperature, top_k, top_p, eos_token_id, generator, step=step)
        first = lambda ids: self.decode(ids, input_ids=input_ids, attention_mask=attention_mask)  # noqa: E731
        return self._generate(decoder_input_ids, first, max_new_tokens, do_sample, temperature, top_k, top_p,
                              eos_token_id, generator)


def _help(why: str) -> str:
    if "memory(" in why:
        return "run it with model.recur / model.run_segments; generate(..., use_cache=False) runs the whole " \
               "sequence as one segment at every token"
    if "no step form" in why or "grows while decoding" in why:
        return "generate(..., use_cache=False) runs the whole model again at every token (no state); evodsl ops " \
               "--json lists each op's step form"
    return "generate needs a causal model that gives next-token logits"


def _own(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy of it when it is a view of a larger tensor (a slice of the stream it was cut from): carried
    to the next segment, it must not keep that tensor alive."""
    whole = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t if whole else t.clone(memory_format=torch.contiguous_format)


def _shape_only(t: torch.Tensor) -> torch.Tensor:
    """A tensor of t's shape holding one element: what a step needs of a value computed at the prompt."""
    return t.new_zeros(()).expand(t.shape)
