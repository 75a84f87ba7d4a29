"""ComfyUI glue of the red-team attacks (UnlearnDiff Attack, Ring-A-Bell Attack): the MODEL and CLIP
wrapped as the plain functions ``red_team_ops`` works on."""
