"""`python3 -m trainer.routing_signal`: the demo's routing measurements (trainer.demo.routing_signal)."""
from trainer.demo.routing_signal import main

if __name__ == "__main__":
    raise SystemExit(main())
