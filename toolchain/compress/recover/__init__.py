"""Recovery after compression: train the compressed canonical model a little, on next-token loss
(LoRA, SliceGPT's recovery fine-tuning) or on the dense model's logits (distillation), and write a
plain canonical model again.

  defaults    device-dependent defaults of the options left unset
  data        training windows (train split), held-out windows, the overlap check
  lora        peft LoRA on explicitly named modules, merged back into plain Linear layers
  distill     the teacher (the dense source) and the losses
  checkpoint  resumable training state: safetensors + JSON, no pickles
  loop        the training loop: accumulation, schedule, clipping, periodic evaluation, best state
  report      recover_report.json and the curve's PNG
  stage       recover_to_dir: all of the above into one output dir, atomically
"""

from toolchain.compress.recover.stage import RecoverResult, recover_to_dir  # noqa: F401
