"""The model: where its files are (:mod:`.sources`) and who they are (:mod:`.identity`), how it
loads (:mod:`.load`) and where it is placed (:mod:`.placement`: devices, dtypes, device maps,
offload), its skeleton before loading (:mod:`.skeleton`) and its parts (:mod:`.anatomy`: blocks,
sublayers, the logit lens, weight targets including experts, calibration hooks)."""
