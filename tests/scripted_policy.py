"""A scripted stand-in for the sampler, for CacheAgentLoop tests: no model, exact tokens."""

import numpy as np

from cacherl_jax.sampling.sampler import Generation


class ScriptedState:
    """Stands in for the sampler's DecodeState: slots are shared by all rows, as in the sampler."""

    def __init__(self, lengths):
        self.lengths = lengths

    @property
    def length(self):
        return max(self.lengths)


class ScriptedPolicy:
    """Emits given token sequences turn by turn (row i, turn k: scripts[i][k]) and records every
    token the loop feeds it, so tests can check what the model would have been conditioned on."""

    def __init__(self, scripts, stop_reasons=None):
        self.scripts = scripts
        self.stop_reasons = stop_reasons or {}
        self.fed = [[] for _ in scripts]
        self.turn = [0] * len(scripts)

    def _emit(self, active):
        out = []
        for row, is_active in enumerate(active):
            if not is_active:
                out.append(Generation(np.zeros(0, np.int32), np.zeros(0), np.zeros(0), "inactive"))
                continue
            ids = np.asarray(self.scripts[row][self.turn[row]], np.int32)
            reason = self.stop_reasons.get((row, self.turn[row]), "stop")
            logp = -0.01 * (1 + np.arange(len(ids), dtype=np.float32)) - row
            out.append(Generation(ids, logp, logp, reason))
            self.fed[row].extend(ids.tolist())
            self.turn[row] += 1
        return out

    def start(self, prompts, sampling, *, max_len):
        self.max_len = max_len
        for row, prompt in enumerate(prompts):
            self.fed[row].extend(prompt)
        generations = self._emit([True] * len(prompts))
        return ScriptedState([len(f) for f in self.fed]), generations

    def resume(self, state, new_tokens, sampling):
        for row, tokens in enumerate(new_tokens):
            self.fed[row].extend(tokens)
        generations = self._emit([bool(t) for t in new_tokens])
        return ScriptedState([len(f) for f in self.fed]), generations
