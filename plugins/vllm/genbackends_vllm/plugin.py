"""placeholder plugin module"""
