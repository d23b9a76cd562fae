"""`zephyr feedback` (`run`): completions from several generators, rated by a judge (`judge`, with the
rubric prompts of `prompts` and UltraFeedback's protocol in `ultrafeedback`), binarized into preference pairs
(`binarize`), with a statistics report (`stats`)."""
