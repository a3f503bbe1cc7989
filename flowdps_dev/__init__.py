"""Development tooling for comfyui-flowdps (not part of the pack ComfyUI loads): set-up, tiny models,
in-process and HTTP ComfyUI harnesses."""
