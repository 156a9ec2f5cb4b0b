"""Models: transformers classes are the model layer; huayu adds family specs, presets and loading."""
