"""dualrec Pico serial tap (MicroPython): app.py is the logic, port.py the hardware layer."""
