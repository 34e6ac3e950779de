"""loramux on Ray Serve (the ``ray`` extra): an ingress deployment (the API) and an engine
deployment (the base model, adapters routed by Serve's model multiplexing), autoscaled on
ongoing requests down to zero. Nothing outside this package and ``loramux.ray_engine``
imports Ray, so the embedded default never needs it."""
