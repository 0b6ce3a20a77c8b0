"""(temporary home until the house move)"""
