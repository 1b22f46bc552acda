# Freeze the tap into a MicroPython firmware image (make BOARD=RPI_PICO FROZEN_MANIFEST=...).
metadata(version="0.1.0", description="dualrec Pico serial tap")
require("usb-device-cdc")
package("dualrec_tap")
module("tapframe.py", base_path="../dualrec")
