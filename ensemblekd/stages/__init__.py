"""The stages of a run, each a thin driver over the layers below: fit, label, distill (its Ray
Train worker loop in `train`), chain (TAKD levels), evaluate, report, export, compare; `validate`
checks a config before any of them starts."""
