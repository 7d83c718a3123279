"""Named configs: `CONFIGS[name]` is a `kvjax.config.Config`.

One module per model family holds a dozen lines of architecture; the variants (`_bf16`, `_turbo`,
...) differ only in their cache settings. Add a model by adding a module and listing it here.
"""

from configs import llama, qwen, smollm2, tiny

CONFIGS = {**smollm2.CONFIGS, **llama.CONFIGS, **qwen.CONFIGS, **tiny.CONFIGS}
